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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    SEEDS: list[int] = Field(
        [],
        description="Run the whole pipeline once per seed (EXPERIMENT.SEED set to each), each under "
        "<ROOT>/seed-<seed>, then a summary over the seeds in <ROOT>/summary: mean ± std of every metric and a "
        "verdict that combines the paired test of each seed. Empty: one run with SEED, under ROOT. `clusterfit run` "
        "only; on Kubernetes run one release per EXPERIMENT.SEED.",
    )

    @field_validator("SEEDS")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"EXPERIMENT.SEEDS {seeds} repeats a seed")
        return seeds

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
    RETRY_BUDGET_S: float = Field(
        120.0,
        ge=0,
        description="After MAX_ATTEMPTS fail on the connection, a 5xx or throttling, keep retrying with growing "
        "pauses (0.5 s up to 10 s) for this long before the step fails; 0: fail at once.",
    )


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


class DataLimitSamplingConfig(Section):
    """Which DATA_LIMIT images a split keeps, as VISSL's `DATA.<SPLIT>.DATA_LIMIT_SAMPLING`."""

    METHOD: Literal["auto", "random", "first"] = Field(
        "auto",
        description="random: VISSL's seeded draw (numpy's legacy `RandomState(SEED).choice` of SKIP_NUM_SAMPLES + "
        "DATA_LIMIT indices without replacement, the first SKIP_NUM_SAMPLES dropped), so the same SEED keeps the same "
        "images as VISSL; first: indices SKIP_NUM_SAMPLES.. in dataset order; auto: random for disk_folder and "
        "disk_filelist (as VISSL, whose folder order is class by class, so the first N images are the first classes "
        "only), first for digits and synthetic (not in VISSL; their order is already class-mixed, and nested subsets "
        "keep the quickstart's numbers comparable). Either way the kept images stay in dataset order (VISSL keeps its "
        "draw's order), and extract records their indices.",
    )
    SEED: int = Field(
        0, description="Seed of the random draw; VISSL's default 0, independent of EXPERIMENT.SEED as in VISSL."
    )
    IS_BALANCED: bool = Field(
        False,
        description="random: draw DATA_LIMIT // classes images per class (the remainder one each to the first "
        "classes), as VISSL's balanced_sub_sampling; needs ground-truth labels.",
    )
    SKIP_NUM_SAMPLES: int = Field(
        0,
        ge=0,
        description="Leave out this many images first (per class when IS_BALANCED), e.g. those of another split.",
    )


class DataSplitConfig(Section):
    DATA_SOURCES: list[Literal["disk_folder", "disk_filelist", "mnist_idx", "digits", "synthetic"]] = Field(
        default_factory=list,
        max_length=1,
        description="Where images come from: an ImageFolder tree (local or s3://), a file list, a folder of "
        "MNIST-format IDX files (Fashion-MNIST, MNIST, KMNIST: train-*/t10k-*-idx?-ubyte[.gz], local or s3://), "
        "scikit-learn's digits, or synthetic images. Empty: the split is not used.",
    )
    DATA_PATHS: list[str] = Field(
        default_factory=list,
        description="disk_folder: the folder or s3:// prefix; disk_filelist: the list file (path[,label] per line); "
        "mnist_idx: the folder or s3:// prefix holding the IDX files.",
    )
    LABEL_PATHS: list[str] = Field(
        default_factory=list,
        description="Pseudo-label file (.npy, int64) to train on instead of the experiment's own cluster labels: "
        "VISSL's `<name>_labels.npy` with its `<name>_images.npy` beside it (realigned to this dataset by image "
        "path; an image VISSL did not label gets -1), or a clusterfit `clusters/<name>/labels.npy` (its "
        "`_SUCCESS.json` records which images, in which order, and is checked). A bare file is refused unless "
        "TRUST_LABEL_ORDER.",
    )
    TRUST_LABEL_ORDER: bool = Field(
        False,
        description="Take a LABEL_PATHS file that has neither VISSL's image list nor our manifest beside it as one "
        "label per image in this dataset's order, unchecked (a warning says so). Not in VISSL, which trains on "
        "its own image list; a mismatch trains on scrambled labels without an error.",
    )
    BATCHSIZE_PER_REPLICA: int = Field(32, ge=1, description="Images per process per step.")
    DATA_LIMIT: int = Field(
        -1, description="Use only N images, chosen as DATA_LIMIT_SAMPLING says (at most all); -1: all."
    )
    DATA_LIMIT_SAMPLING: DataLimitSamplingConfig = Field(
        default_factory=DataLimitSamplingConfig, description="Which images DATA_LIMIT keeps."
    )
    SYNTHETIC_SIZE: int = Field(256, ge=1, description="synthetic: number of images.")
    IMAGE_SIZE: int = Field(
        32, ge=8, description="digits/synthetic/mnist_idx: side of the RGB image made from the source in pixels."
    )

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
    LINK_ROOTS: list[str] = Field(
        default_factory=list,
        description="Local folders (absolute paths or file:// URIs) that symlinks in a local dataset may lead into, "
        "besides the dataset root: a subset built as links into a big dataset elsewhere. A link to anywhere else is "
        "a bad image (outside_root). Each must be an existing folder; one list for every split.",
    )


class WeightsInitConfig(Section):
    PARAMS_FILE: str = Field(
        "",
        description="Checkpoint to initialise the trunk from (local path or s3://). Empty: pretrain's output, else "
        "random.",
    )
    STATE_DICT_KEY_NAME: str | list[str] = Field(
        "classy_state_dict",
        description="Where the state dict sits in the checkpoint: VISSL's list of nested keys "
        "([classy_state_dict, base_model, model, trunk]) or a string, dots for nesting unless the whole string is a "
        "key; '' if the file is the state dict itself. Exactly the string 'classy_state_dict' means VISSL's layout "
        "(classy_state_dict.base_model.model.{trunk,heads}, or the flat state dict our files before format 2 "
        "held): names are mapped onto the model's and REMOVE_PREFIX/APPEND_PREFIX are ignored, as in VISSL; the "
        "list [classy_state_dict] applies them.",
    )
    SKIP_LAYERS: list[str] = Field(
        default_factory=lambda: ["num_batches_tracked"],
        description="Substrings of parameter names not to load. Matched, as in VISSL, against the model's names "
        "after the prefixes (trunk._feature_blocks.layer4); unlike VISSL also against the checkpoint's own key "
        "(module.layer4), so a pattern copied from the file works too. Skipped parameters keep their initial value.",
    )
    REMOVE_PREFIX: str = Field(
        "",
        description="Prefix removed from every checkpoint key (before APPEND_PREFIX); ignored when "
        "STATE_DICT_KEY_NAME is 'classy_state_dict', as in VISSL.",
    )
    APPEND_PREFIX: str = Field(
        "",
        description="Prefix added to every key; torchvision ResNet: 'trunk._feature_blocks.' (or "
        "'trunk.base_model._feature_blocks.'); ignored when STATE_DICT_KEY_NAME is 'classy_state_dict', as in VISSL.",
    )

    @model_validator(mode="after")
    def _no_empty_nested_key(self) -> WeightsInitConfig:
        if isinstance(self.STATE_DICT_KEY_NAME, list) and not all(self.STATE_DICT_KEY_NAME):
            raise ValueError(
                f"STATE_DICT_KEY_NAME={self.STATE_DICT_KEY_NAME!r}: a list of nested keys cannot hold an empty key; "
                "write '' (not a list) for a file that is the state dict itself"
            )
        return self


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
    TEST_PARTITION: Literal["TRAIN", "TEST", ""] | None = Field(
        None,
        description="VISSL's key: the other split assigned to the centroids; '' for none. Unset (null): every "
        "other split in EXTRACT.PARTITIONS, which with DATA_PARTITION=TRAIN is VISSL's default TEST.",
    )
    DIMENSIONALITY_REDUCTION: int = Field(
        0,
        ge=0,
        description="VISSL's key: PCA to this many dimensions before k-means, fitted on the sampled training points "
        "(after L2_NORMALIZE) and applied to every assigned split; 0: off.",
    )
    PCA_WHITENING: Literal["whiten", "whiten_l2", "none"] = Field(
        "whiten",
        description="With DIMENSIONALITY_REDUCTION: 'whiten' scales each component to unit variance (VISSL's PCA); "
        "'whiten_l2' also L2-normalises the projected rows (DeepCluster's preprocess_features); 'none' projects only.",
    )


class ClusterFitConfig(Section):
    NUM_CLUSTERS: int = Field(
        16000,
        ge=2,
        description="K, the number of k-means clusters (the pseudo-label classes). A list ([10, 30, 100]) sweeps K: "
        "pretrain and extract run once, cluster and train once per K (clusters/<layer>-k<K>, train-k<K>), and "
        "evaluate compares every K in one report; NUM_CLUSTERS is then the first and NUM_CLUSTERS_SWEEP the list.",
    )
    NUM_CLUSTERS_SWEEP: list[Annotated[int, Field(ge=2)]] = Field(
        [],
        description="Every K of a sweep (set by writing a list to NUM_CLUSTERS); empty: NUM_CLUSTERS alone.",
    )
    CLUSTER_BACKEND: Literal["faiss", "torch"] = Field(
        "faiss", description="k-means implementation: faiss, or a matmul-based torch one (GPU when present)."
    )
    N_ITER: int = Field(50, ge=1, description="k-means iterations (VISSL's NUM_ITER is accepted for it).")
    DATA_LIMIT: int = Field(
        -1,
        ge=-1,
        description="VISSL's key: train the centroids on at most this many features, sampled with EXPERIMENT.SEED "
        "(VISSL: DATA_LIMIT_SAMPLING.SEED); -1: all, up to K x MAX_POINTS_PER_CENTROID, as faiss caps VISSL's too.",
    )
    FEATURES: FeaturesConfig = Field(default_factory=FeaturesConfig, description="Which features are clustered.")
    L2_NORMALIZE: bool = Field(
        True, description="L2-normalise features before clustering and assignment (VISSL's default)."
    )
    MAX_POINTS_PER_CENTROID: int = Field(
        256, ge=1, description="Centroids are trained on at most K x this many sampled points."
    )
    ALGORITHM: Literal["auto", "lloyd", "superkmeans"] = Field(
        "auto",
        description="faiss algorithm: plain Lloyd (faiss.Kmeans, VISSL's), SuperKMeans (faiss >= 1.14.3, CPU only), "
        "or auto: SuperKMeans where the installed faiss has it, d >= 1024 and K >= 4096 (1024 off the unit sphere), "
        "else Lloyd; the same on every device, recorded in stats.json. The torch backend runs Lloyd.",
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

    @model_validator(mode="before")
    @classmethod
    def _vissl_spellings(cls, data: Any) -> Any:
        data = take_aliases(data, ("CLUSTERFIT",))
        if isinstance(data, dict) and isinstance(data.get("NUM_CLUSTERS"), list):  # a sweep over K
            sweep = data["NUM_CLUSTERS"]
            if not sweep:
                raise ValueError("CLUSTERFIT.NUM_CLUSTERS is an empty list; give one K or a list of them")
            if data.get("NUM_CLUSTERS_SWEEP") not in (None, [], sweep):
                raise ValueError(
                    f"CLUSTERFIT.NUM_CLUSTERS={sweep} and CLUSTERFIT.NUM_CLUSTERS_SWEEP={data['NUM_CLUSTERS_SWEEP']} "
                    "disagree; set the list in NUM_CLUSTERS only"
                )
            data = {**data, "NUM_CLUSTERS": sweep[0], "NUM_CLUSTERS_SWEEP": sweep}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ClusterFitConfig:
        sweep = self.NUM_CLUSTERS_SWEEP
        if len(set(sweep)) != len(sweep):
            raise ValueError(f"CLUSTERFIT.NUM_CLUSTERS {sweep} repeats a K")
        if sweep and self.NUM_CLUSTERS not in sweep:
            raise ValueError(
                f"CLUSTERFIT.NUM_CLUSTERS={self.NUM_CLUSTERS} is not in CLUSTERFIT.NUM_CLUSTERS_SWEEP={sweep}; set the "
                "list in NUM_CLUSTERS only"
            )
        if self.DATA_LIMIT != -1 and max(self.cluster_counts) > self.DATA_LIMIT:
            raise ValueError(
                f"CLUSTERFIT.DATA_LIMIT={self.DATA_LIMIT} samples fewer features than CLUSTERFIT.NUM_CLUSTERS="
                f"{max(self.cluster_counts)}; use -1 (all) or at least K"
            )
        if self.ALGORITHM == "superkmeans" and self.CLUSTER_BACKEND != "faiss":
            raise ValueError(
                "CLUSTERFIT.ALGORITHM=superkmeans needs CLUSTERFIT.CLUSTER_BACKEND=faiss; the torch backend runs Lloyd"
            )
        return self

    @property
    def cluster_counts(self) -> list[int]:
        """Every K the experiment covers: the sweep, or NUM_CLUSTERS alone."""
        return list(self.NUM_CLUSTERS_SWEEP) or [self.NUM_CLUSTERS]

    @property
    def is_sweep(self) -> bool:
        return len(self.cluster_counts) > 1


# VISSL's spellings of our keys, per section: the code of VISSL's tools reads CLUSTERFIT.NUM_ITER
# where its ClusterFit page (and so our schema) says N_ITER.
ALIASES: dict[tuple[str, ...], dict[str, str]] = {("CLUSTERFIT",): {"NUM_ITER": "N_ITER"}}


def take_aliases(data: Any, section: tuple[str, ...]) -> Any:
    """A section's raw dict with VISSL's spellings moved to our keys; both with different values is an error."""
    aliases = ALIASES.get(section, {})
    if not isinstance(data, dict) or not aliases.keys() & data.keys():
        return data
    data = dict(data)
    where = ".".join(section)
    for alias, canonical in aliases.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if canonical in data and data[canonical] != value:
            raise ValueError(
                f"{where}.{alias}={value!r} and {where}.{canonical}={data[canonical]!r} are the same key "
                "(VISSL's spelling and ours) with different values; keep one"
            )
        data[canonical] = value
    return data


def canonical_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """One layer of a raw config (a file, or the overrides) with VISSL's spellings renamed to our keys,
    so that a later layer's `NUM_ITER` replaces an earlier layer's `N_ITER` when the two are merged.
    A layer that gives both spellings is left as it is, for validation to name the conflict."""
    for section in ALIASES:
        tree = _rename_in(tree, section, section)
    return tree


def _rename_in(node: dict[str, Any], rest: tuple[str, ...], section: tuple[str, ...]) -> dict[str, Any]:
    if not rest:
        try:
            renamed: dict[str, Any] = take_aliases(node, section)
        except ValueError:
            return node
        return renamed
    child = node.get(rest[0])
    if not isinstance(child, dict):
        return node
    return {**node, rest[0]: _rename_in(child, rest[1:], section)}


class ExtractConfig(Section):
    CHUNK_SIZE: int = Field(4096, ge=1, description="Images per part file; memory is bounded by one chunk.")
    POOL_SIZE: int = Field(
        1, ge=1, description="Feature maps are adaptive-average-pooled to POOL_SIZE x POOL_SIZE and flattened."
    )
    PARTITIONS: list[Literal["TRAIN", "TEST"]] = Field(
        ["TRAIN", "TEST"],
        description="Splits to extract (those configured in DATA); other splits are assigned to the same centroids.",
    )
    STORAGE_DTYPE: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="How part files store features: float16 or bfloat16 halve the bytes (2048-d: 4 KiB per image "
        "in float32); the cluster step reads any of them as float32. bfloat16 keeps float32's range and is stored "
        "as its upper 16 bits (uint16 .npy); float16 refuses features beyond its range (65504).",
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
    WARMUP_EPOCHS: int = Field(
        5,
        ge=0,
        description="Linear warm-up epochs, VISSL's composite schedule (linear, then multistep; update_interval "
        "epoch): the LR is set once per epoch and ramps from the LR of one node's batch (BASE_LR x per-node batch / "
        "BASE_LR_BATCH_SIZE when AUTO_SCALE_LR) to the scaled LR, so on one node there is none.",
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
    BATCHSIZE_PER_REPLICA: int = Field(
        32, ge=1, description="Images per process per step (ROTATIONS all4: each gives 4 inputs; one_random: 1)."
    )
    ROTATIONS: Literal["all4", "one_random"] = Field(
        "all4",
        description="all4: every image at 0/90/180/270 degrees in the same batch (Gidaris et al. found it better "
        "than one rotation per image). one_random: VISSL's ImgRotatePil, one rotation drawn per image and applied "
        "before the crop; we turn the image losslessly (PIL transpose) where VISSL's TF.rotate keeps the original "
        "frame, which on non-square images cuts the picture and adds black bars that give the rotation away.",
    )
    COLOR_JITTER: list[float] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="ColorJitter for pretraining (brightness, contrast, saturation, hue; all zero: none, as VISSL's "
        "RotNet); null: DATA.TRANSFORMS.COLOR_JITTER. The other transforms are DATA.TRANSFORMS'.",
    )


class CheckpointConfig(Section):
    CHECKPOINT_FREQUENCY: int = Field(1, ge=1, description="Write a checkpoint every N epochs.")
    CHECKPOINT_ITER_FREQUENCY: int = Field(-1, description="Also write one every N steps; -1: off.")
    AUTO_RESUME: bool = Field(True, description="Resume from the latest checkpoint when one exists.")


PoolLayer = Literal["conv1", "res2", "res3", "res4", "res5", "res5avg"]


def _vissl_pooling() -> dict[PoolLayer, list[int]]:
    return {"conv1": [10, 10, 4], "res2": [16, 8, 0], "res3": [13, 5, 0], "res4": [8, 3, 0], "res5": [6, 1, 0]}


class VisslLinearConfig(Section):
    """EVALUATE.PROTOCOL=vissl_linear: VISSL's `eval_resnet_8gpu_transfer_in1k_linear` benchmark, whose numbers
    the model zoo quotes. A BatchNorm + Linear head (VISSL's `eval_mlp`) per layer in EVALUATE.LAYERS on the
    frozen trunk's pooled map, trained on TRAIN images with RandomResizedCrop and flip (DATA.TRANSFORMS, no colour
    jitter), tested on TEST's centre crops after the last epoch. Where we differ from VISSL: one process (BN over
    BATCH_SIZE images is VISSL's SyncBN over 8 x 32), and no second head without BN on res5avg."""

    POOLING: dict[PoolLayer, Annotated[list[int], Field(min_length=3, max_length=3)]] = Field(
        default_factory=_vissl_pooling,
        description="AvgPool2d [kernel, stride, padding] per layer, VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP for "
        "ResNet-50; a layer not listed (res5avg) is used as it is. Unlike VISSL, which fails there, a map smaller "
        "than its kernel (small images) is adaptive-average-pooled to the grid VISSL's op gives at 224 pixels "
        "(res4: 3x3), so the head keeps VISSL's shape.",
    )
    BATCH_SIZE: int = Field(
        256, ge=2, description="Images per step (VISSL: 32 per GPU x 8 GPUs); the LR scales from OPTIMIZER's base."
    )
    OPTIMIZER: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(
            NUM_EPOCHS=28,
            BASE_LR=0.01,
            BASE_LR_BATCH_SIZE=256,
            MOMENTUM=0.9,
            NESTEROV=True,
            WEIGHT_DECAY=5e-4,
            REGULARIZE_BN=False,
            REGULARIZE_BIAS=True,
            WARMUP_EPOCHS=0,
            MILESTONES=[8, 16, 24],
            GAMMA=0.1,
        ),
        description="The heads' SGD and schedule, VISSL's: 28 epochs, Nesterov, LR 0.01 at 256 images x 0.1 at "
        "epochs 8, 16, 24, weight decay 5e-4 (none on BN).",
    )


class EvaluateConfig(Section):
    PROTOCOL: Literal["quick", "vissl_linear"] = Field(
        "quick",
        description="quick: kNN, low-shot kNN and a linear probe on extracted features (minutes; small data). "
        "vissl_linear: VISSL's linear benchmark (VISSL_LINEAR), comparable with the model zoo's ImageNet numbers.",
    )
    VISSL_LINEAR: VisslLinearConfig = Field(
        default_factory=VisslLinearConfig, description="VISSL's linear benchmark, used when PROTOCOL=vissl_linear."
    )
    SIGNIFICANCE: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="A difference is called better or worse when its paired test (McNemar mid-p on the same TEST "
        "images; a paired bootstrap over images and draws for low-shot) gives p below this.",
    )
    OTHER_SEEDS: list[str] = Field(
        [],
        description="URIs of eval/metrics.json of this experiment run with other EXPERIMENT.SEEDs; the report adds "
        "the mean ± std over all seeds.",
    )
    LAYERS: list[Literal["conv1", "res2", "res3", "res4", "res5", "res5avg"]] = Field(
        ["res4", "res5avg"], description="Layers whose frozen features are probed."
    )
    KNN_K: int = Field(20, ge=1, description="Neighbours for kNN top-1 (cosine, temperature-weighted votes).")
    KNN_TEMPERATURE: float = Field(0.07, gt=0, description="kNN vote temperature.")
    LOW_SHOT: list[Annotated[int, Field(ge=1)]] = Field(
        [],
        description="Labelled TRAIN images per class for low-shot kNN top-1, one metric per entry (e.g. [1, 10]); [] "
        "for none. PROTOCOL=quick only.",
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
    BASELINES: list[Literal["random", "pixels", "supervised"]] = Field(
        ["random", "pixels"],
        description="Reference rows: a randomly initialised trunk, raw pixels, and supervised: the same network "
        "trained from scratch on the true TRAIN labels with the same OPTIMIZER schedule (by the train step, into "
        "supervised/), the upper bound ClusterFit's gain is measured against.",
    )


class PipelineConfig(Section):
    STEPS: list[Literal["pretrain", "extract", "cluster", "train", "evaluate"]] = Field(
        ["extract", "cluster", "train", "evaluate"], description="Steps `clusterfit run` executes, in pipeline order."
    )
    LEASE_TTL_S: float = Field(
        60.0,
        gt=0,
        description="Seconds the experiment root's lease (<ROOT>/_lease.json, one run at a time) lasts unless its "
        "holder renews it (every third of this): how long a killed run keeps others out.",
    )


class DistributedConfig(Section):
    NUM_NODES: int = Field(1, ge=1, description="Machines (pods) per step.")
    NUM_PROC_PER_NODE: int = Field(1, ge=1, description="Processes per machine (one per GPU).")
    BACKEND: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU."
    )
    TIMEOUT_S: float = Field(
        600.0,
        gt=0,
        description="Seconds a rank waits for the others: to meet them (init_process_group; torchrun's rendezvous "
        "across pods) and in each collective or barrier (rank 0 publishing while the others wait). When one pod "
        "of a step restarts, its peers fail at their next collective (gloo at once, nccl after this long) and "
        "restart too, and all wait up to this long to meet again; raise it when rank 0's publication takes longer.",
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
        if self.DATA.TRAIN.LABEL_PATHS and self.CLUSTERFIT.is_sweep:
            raise ValueError(
                f"CLUSTERFIT.NUM_CLUSTERS sweeps K {self.CLUSTERFIT.cluster_counts}, but DATA.TRAIN.LABEL_PATHS gives "
                "the labels to train on; a sweep trains on the experiment's own clusters of each K: remove one"
            )
        if len(self.DATA.TRAIN.LABEL_PATHS) > 1:
            raise ValueError(
                f"DATA.TRAIN.LABEL_PATHS: one label file is supported, got {len(self.DATA.TRAIN.LABEL_PATHS)}"
            )
        return self

    def with_num_clusters(self, k: int) -> Config:
        """This config for one K of CLUSTERFIT.NUM_CLUSTERS_SWEEP (the sweep kept: it names the train folder)."""
        if k not in self.CLUSTERFIT.cluster_counts:
            raise ValueError(f"K={k} is not one of CLUSTERFIT.NUM_CLUSTERS {self.CLUSTERFIT.cluster_counts}")
        return self.model_copy(update={"CLUSTERFIT": self.CLUSTERFIT.model_copy(update={"NUM_CLUSTERS": k})})

    def with_seed(self, seed: int) -> Config:
        """One run of EXPERIMENT.SEEDS: SEED set, SEEDS emptied, the root under <ROOT>/seed-<seed>."""
        root = f"{self.EXPERIMENT.root_uri}/seed-{seed}"
        experiment = self.EXPERIMENT.model_copy(update={"SEED": seed, "SEEDS": [], "ROOT": root})
        return self.model_copy(update={"EXPERIMENT": experiment})

    @property
    def global_batch_size(self) -> int:
        return self.DATA.TRAIN.BATCHSIZE_PER_REPLICA * self.DISTRIBUTED.world_size

    def split(self, partition: str) -> DataSplitConfig:
        split: DataSplitConfig = getattr(self.DATA, partition)
        return split
