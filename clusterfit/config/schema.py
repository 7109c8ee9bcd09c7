"""The experiment configuration's schema: one pydantic model per section, each field documented.

    clusterfit config show config=quickstart config.CLUSTERFIT.NUM_CLUSTERS=10
    clusterfit config schema

Key names and casing follow VISSL's ClusterFit documentation for every key it documents
(`CLUSTERFIT.*`, `MODEL.WEIGHTS_INIT.*`, `DISTRIBUTED.*`, `DATA.TRAIN.LABEL_PATHS`); the rest
uses the same upper-case convention. Derived values (global batch size, scaled learning rate) are
properties, never written back. Loading lives in `config.loading`. No deep-learning import here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clusterfit.config.kubernetes import KubernetesConfig

PARTITIONS = ("TRAIN", "TEST")
LAYERS = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
STEPS = ("pretrain", "extract", "cluster", "train", "evaluate")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ExperimentConfig(Section):
    NAME: str = Field("clusterfit", description="Experiment name; names the run folder and the Kubernetes objects.")
    ROOT: str = Field(
        "",
        description="Artifact root URI (file:// or s3://bucket/prefix). Empty: file://./runs/<NAME> in the current "
        "directory.",
    )
    SEED: int = Field(0, description="Seed for sampling, initialisation and data order.")

    @property
    def root_uri(self) -> str:
        if self.ROOT:
            return self.ROOT.rstrip("/")
        return (Path.cwd() / "runs" / self.NAME).as_uri()


class S3Config(Section):
    ENDPOINT_URL: str = Field(
        "", description="S3 endpoint; empty: AWS_ENDPOINT_URL or AWS's default. Credentials never go here."
    )
    REGION: str = Field("", description="Region name; empty: the AWS credential chain's, else us-east-1.")
    ADDRESSING_STYLE: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket addressing; 'path' for most self-hosted S3-compatible stores."
    )
    CHECKSUMS: Literal["when_supported", "when_required"] = Field(
        "when_supported",
        description="boto3's request/response checksum mode; 'when_required' for S3-compatible stores that reject "
        "the newer default checksums.",
    )
    MULTIPART_THRESHOLD_MB: int = Field(64, ge=5, description="Objects at least this large are transferred in parts.")
    MULTIPART_CHUNKSIZE_MB: int = Field(16, ge=5, description="Size of one multipart part.")
    MAX_CONCURRENCY: int = Field(8, ge=1, description="Parallel part transfers per object.")
    MAX_ATTEMPTS: int = Field(5, ge=1, description="Attempts per request (boto3 'standard' retry mode).")
    CONNECT_TIMEOUT_S: float = Field(5.0, gt=0, description="Seconds to wait for a TCP connection.")
    READ_TIMEOUT_S: float = Field(60.0, gt=0, description="Seconds to wait for a response.")


class StorageConfig(Section):
    S3: S3Config = Field(default_factory=S3Config, description="Settings for s3:// URIs.")


class TransformsConfig(Section):
    TRAIN_CROP_SIZE: int = Field(224, ge=8, description="RandomResizedCrop output size for training.")
    TRAIN_MIN_SCALE: float = Field(0.08, gt=0, le=1, description="Smallest crop area fraction of RandomResizedCrop.")
    COLOR_JITTER: list[float] = Field(
        default_factory=lambda: [0.4, 0.4, 0.4, 0.2],
        min_length=4,
        max_length=4,
        description="ColorJitter brightness, contrast, saturation, hue; all zero disables it.",
    )
    HORIZONTAL_FLIP: bool = Field(True, description="Random horizontal flip during training.")
    EVAL_RESIZE: int = Field(
        256, ge=8, description="Resize (shorter side) before the centre crop at extraction/evaluation."
    )
    EVAL_CROP_SIZE: int = Field(224, ge=8, description="CenterCrop size at extraction/evaluation.")
    MEAN: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], description="Normalisation mean (RGB).")
    STD: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], description="Normalisation std (RGB).")


class DataSplitConfig(Section):
    DATA_SOURCES: list[Literal["disk_folder", "disk_filelist", "digits", "synthetic"]] = Field(
        default_factory=list,
        max_length=1,
        description="Where images come from: an ImageFolder tree (local or s3://), a file list, scikit-learn's "
        "digits, or synthetic images. Empty: the split is not used.",
    )
    DATA_PATHS: list[str] = Field(
        default_factory=list,
        description="disk_folder: the folder or s3:// prefix; disk_filelist: the list file (path[,label] per line).",
    )
    LABEL_PATHS: list[str] = Field(
        default_factory=list,
        description="Pseudo-label files (.npy, int64, one per dataset index) to train on instead of the experiment's "
        "own cluster labels.",
    )
    BATCHSIZE_PER_REPLICA: int = Field(32, ge=1, description="Images per process per step.")
    DATA_LIMIT: int = Field(-1, description="Use only the first N images (in dataset order); -1: all.")
    SYNTHETIC_SIZE: int = Field(256, ge=1, description="synthetic: number of images.")
    IMAGE_SIZE: int = Field(32, ge=8, description="digits/synthetic: side of the generated RGB image in pixels.")

    @property
    def enabled(self) -> bool:
        return bool(self.DATA_SOURCES)

    @property
    def source(self) -> str:
        return self.DATA_SOURCES[0] if self.DATA_SOURCES else ""


class DataConfig(Section):
    TRAIN: DataSplitConfig = Field(
        default_factory=DataSplitConfig, description="The split that is clustered and trained on."
    )
    TEST: DataSplitConfig = Field(
        default_factory=DataSplitConfig, description="A labelled split for evaluation (optional)."
    )
    TRANSFORMS: TransformsConfig = Field(default_factory=TransformsConfig, description="Image transforms.")
    NUM_DATALOADER_WORKERS: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    ON_BAD_IMAGE: Literal["error", "skip"] = Field(
        "error",
        description="A corrupt or unreadable image: fail naming the file, or skip it and count it in the step summary.",
    )


class WeightsInitConfig(Section):
    PARAMS_FILE: str = Field(
        "",
        description="Checkpoint to initialise the trunk from (local path or s3://). Empty: pretrain's output, else "
        "random.",
    )
    STATE_DICT_KEY_NAME: str = Field(
        "classy_state_dict",
        description="Key holding the state dict in the checkpoint (dots for nesting); '' if the file is the state "
        "dict itself.",
    )
    SKIP_LAYERS: list[str] = Field(
        default_factory=lambda: ["num_batches_tracked"],
        description="Checkpoint keys containing any of these substrings are not loaded.",
    )
    REMOVE_PREFIX: str = Field("", description="Prefix removed from every checkpoint key (before APPEND_PREFIX).")
    APPEND_PREFIX: str = Field(
        "",
        description="Prefix added to every key; torchvision ResNet: 'trunk._feature_blocks.' (or "
        "'trunk.base_model._feature_blocks.').",
    )


class TrunkConfig(Section):
    NAME: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = Field(
        "resnet50", description="torchvision classification trunk, built with torchvision.models.get_model."
    )
    SMALL_IMAGE_STEM: bool = Field(
        False, description="3x3 stride-1 first conv and no max-pool (CIFAR-style), for images of 32 px or less."
    )


class AmpConfig(Section):
    USE_AMP: bool = Field(True, description="Mixed precision (bf16 autocast) on CUDA; ignored on CPU.")


class ModelConfig(Section):
    TRUNK: TrunkConfig = Field(default_factory=TrunkConfig, description="The network architecture.")
    WEIGHTS_INIT: WeightsInitConfig = Field(
        default_factory=WeightsInitConfig, description="Initial weights for extraction."
    )
    AMP_PARAMS: AmpConfig = Field(default_factory=AmpConfig, description="Mixed precision.")
    CHANNELS_LAST: bool = Field(
        True,
        description="channels_last (NHWC) memory format: faster convolutions with oneDNN on CPU and tensor cores on "
        "CUDA.",
    )


class FeaturesConfig(Section):
    DATA_PARTITION: Literal["TRAIN", "TEST"] = Field("TRAIN", description="Which split's features are clustered.")
    DATASET_NAME: str = Field(
        "digits", description="Name of the dataset the features come from (recorded in the artifacts)."
    )
    LAYER_NAME: Literal["conv1", "res2", "res3", "res4", "res5", "res5avg"] = Field(
        "res5", description="Layer whose features are clustered; feature maps are average-pooled (EXTRACT.POOL_SIZE)."
    )


class ClusterFitConfig(Section):
    NUM_CLUSTERS: int = Field(16000, ge=2, description="K, the number of k-means clusters (the pseudo-label classes).")
    CLUSTER_BACKEND: Literal["faiss", "torch"] = Field(
        "faiss", description="k-means implementation: faiss, or a matmul-based torch one (GPU when present)."
    )
    N_ITER: int = Field(50, ge=1, description="k-means iterations.")
    FEATURES: FeaturesConfig = Field(default_factory=FeaturesConfig, description="Which features are clustered.")
    L2_NORMALIZE: bool = Field(
        True, description="L2-normalise features before clustering and assignment (VISSL's default)."
    )
    MAX_POINTS_PER_CENTROID: int = Field(
        256, ge=1, description="Centroids are trained on at most K x this many sampled points."
    )
    ALGORITHM: Literal["auto", "lloyd", "superkmeans"] = Field(
        "auto", description="faiss algorithm: plain Lloyd (faiss.Kmeans), SuperKMeans, or chosen by shape."
    )
    ASSIGN_BATCH_SIZE: int = Field(
        65536, ge=1, description="Features assigned per search call while streaming the parts."
    )
    CACHE_FEATURES_MB: int = Field(
        4096,
        ge=0,
        description="Keep features in memory between sampling and assignment when they fit in this many MB; else "
        "stream twice.",
    )
    RANK_WAIT_TIMEOUT_S: float = Field(
        3600.0, gt=0, description="How long ranks wait for each other's partial results."
    )


class ExtractConfig(Section):
    CHUNK_SIZE: int = Field(4096, ge=1, description="Images per part file; memory is bounded by one chunk.")
    POOL_SIZE: int = Field(
        1, ge=1, description="Feature maps are adaptive-average-pooled to POOL_SIZE x POOL_SIZE and flattened."
    )
    PARTITIONS: list[Literal["TRAIN", "TEST"]] = Field(
        ["TRAIN", "TEST"],
        description="Splits to extract (those configured in DATA); other splits are assigned to the same centroids.",
    )


class OptimizerConfig(Section):
    NAME: Literal["sgd"] = Field("sgd", description="Optimizer.")
    MOMENTUM: float = Field(0.9, ge=0, description="SGD momentum.")
    NESTEROV: bool = Field(False, description="Nesterov momentum.")
    WEIGHT_DECAY: float = Field(1e-4, ge=0, description="Weight decay.")
    REGULARIZE_BN: bool = Field(False, description="Apply weight decay to BatchNorm parameters (VISSL: no).")
    REGULARIZE_BIAS: bool = Field(True, description="Apply weight decay to biases.")
    NUM_EPOCHS: int = Field(105, ge=1, description="Training epochs.")
    BASE_LR: float = Field(0.1, gt=0, description="Learning rate at BASE_LR_BATCH_SIZE images per step.")
    BASE_LR_BATCH_SIZE: int = Field(256, ge=1, description="Global batch size BASE_LR refers to.")
    AUTO_SCALE_LR: bool = Field(True, description="Scale BASE_LR linearly by global batch / BASE_LR_BATCH_SIZE.")
    WARMUP_EPOCHS: int = Field(5, ge=0, description="Linear warm-up epochs.")
    WARMUP_MULTI_NODE_ONLY: bool = Field(
        True, description="Warm up only when DISTRIBUTED.NUM_NODES > 1 (VISSL's recipe)."
    )
    MILESTONES: list[int] = Field(
        default_factory=lambda: [30, 60, 90, 100], description="Epochs at which the LR is multiplied by GAMMA."
    )
    GAMMA: float = Field(0.1, gt=0, description="Step-schedule factor.")


class PretrainConfig(Section):
    OPTIMIZER: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(NUM_EPOCHS=35, MILESTONES=[10, 20, 30]),
        description="RotNet pretraining optimizer and schedule.",
    )
    BATCHSIZE_PER_REPLICA: int = Field(32, ge=1, description="Images per process per step (each gives 4 rotations).")


class CheckpointConfig(Section):
    CHECKPOINT_FREQUENCY: int = Field(1, ge=1, description="Write a checkpoint every N epochs.")
    CHECKPOINT_ITER_FREQUENCY: int = Field(-1, description="Also write one every N steps; -1: off.")
    AUTO_RESUME: bool = Field(True, description="Resume from the latest checkpoint when one exists.")


class EvaluateConfig(Section):
    LAYERS: list[Literal["conv1", "res2", "res3", "res4", "res5", "res5avg"]] = Field(
        ["res4", "res5avg"], description="Layers whose frozen features are probed."
    )
    KNN_K: int = Field(20, ge=1, description="Neighbours for kNN top-1 (cosine, temperature-weighted votes).")
    KNN_TEMPERATURE: float = Field(0.07, gt=0, description="kNN vote temperature.")
    LOW_SHOT: list[Annotated[int, Field(ge=1)]] = Field(
        [],
        description="Labelled TRAIN images per class for low-shot kNN top-1, one metric per entry (e.g. [1, 10]); [] "
        "for none.",
    )
    LOW_SHOT_DRAWS: int = Field(
        20,
        ge=1,
        description="Random labelled subsets per low-shot entry (the same for every model); results are their mean.",
    )
    LINEAR_EPOCHS: int = Field(100, ge=1, description="Epochs of the linear probe.")
    LINEAR_LR: float = Field(0.1, gt=0, description="Linear probe learning rate (SGD, cosine).")
    LINEAR_WEIGHT_DECAY: float = Field(1e-4, ge=0, description="Linear probe weight decay.")
    PIXELS_SIZE: int = Field(
        32, ge=1, description="Raw-pixel baseline: images average-pooled to at most this many pixels a side."
    )
    BASELINES: list[Literal["random", "pixels"]] = Field(
        ["random", "pixels"], description="Reference rows: a randomly initialised trunk, raw pixels."
    )


class PipelineConfig(Section):
    STEPS: list[Literal["pretrain", "extract", "cluster", "train", "evaluate"]] = Field(
        ["extract", "cluster", "train", "evaluate"], description="Steps `clusterfit run` executes, in pipeline order."
    )


class DistributedConfig(Section):
    NUM_NODES: int = Field(1, ge=1, description="Machines (pods) per step.")
    NUM_PROC_PER_NODE: int = Field(1, ge=1, description="Processes per machine (one per GPU).")
    BACKEND: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU."
    )

    @property
    def world_size(self) -> int:
        return self.NUM_NODES * self.NUM_PROC_PER_NODE


class LogConfig(Section):
    PROGRESS_INTERVAL_S: float = Field(
        30.0, gt=0, description="Seconds between plain progress lines when not on a terminal."
    )


class Config(Section):
    """One experiment."""

    EXPERIMENT: ExperimentConfig = Field(default_factory=ExperimentConfig, description="Name, artifact root, seed.")
    STORAGE: StorageConfig = Field(default_factory=StorageConfig, description="Object storage.")
    DATA: DataConfig = Field(default_factory=DataConfig, description="Datasets and transforms.")
    MODEL: ModelConfig = Field(default_factory=ModelConfig, description="Network and its initial weights.")
    CLUSTERFIT: ClusterFitConfig = Field(default_factory=ClusterFitConfig, description="Step 1: clustering.")
    EXTRACT: ExtractConfig = Field(default_factory=ExtractConfig, description="Feature extraction.")
    PRETRAIN: PretrainConfig = Field(
        default_factory=PretrainConfig, description="RotNet pretraining (when PIPELINE.STEPS has pretrain)."
    )
    OPTIMIZER: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Step 2: training on the cluster labels."
    )
    CHECKPOINT: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Training checkpoints.")
    EVALUATE: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation protocol.")
    PIPELINE: PipelineConfig = Field(default_factory=PipelineConfig, description="Which steps run.")
    DISTRIBUTED: DistributedConfig = Field(default_factory=DistributedConfig, description="Processes and nodes.")
    KUBERNETES: KubernetesConfig = Field(default_factory=KubernetesConfig, description="How steps run as PyTorchJobs.")
    LOG: LogConfig = Field(default_factory=LogConfig, description="Logging and progress.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if "pretrain" in self.PIPELINE.STEPS and self.MODEL.WEIGHTS_INIT.PARAMS_FILE:
            raise ValueError(
                "PIPELINE.STEPS includes pretrain, but MODEL.WEIGHTS_INIT.PARAMS_FILE is set: "
                "pretrain produces the starting weights; remove one of them"
            )
        if len(self.DATA.TRAIN.LABEL_PATHS) > 1:
            raise ValueError(
                f"DATA.TRAIN.LABEL_PATHS: one label file is supported, got {len(self.DATA.TRAIN.LABEL_PATHS)}"
            )
        return self

    @property
    def global_batch_size(self) -> int:
        return self.DATA.TRAIN.BATCHSIZE_PER_REPLICA * self.DISTRIBUTED.world_size

    def split(self, partition: str) -> DataSplitConfig:
        split: DataSplitConfig = getattr(self.DATA, partition)
        return split
