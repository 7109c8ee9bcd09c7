# The two commands of the README's quick start, and what they stand on.
#   make quickstart   set up .venv and run the whole pipeline on the digits quickstart (CPU)
#   make test         set up .venv, build the test servers (cached), lint, type-check, run every test:
#                     the fast ones, then the pipeline on a real single-node Kubernetes cluster and the
#                     storage fault tests (MinIO behind toxiproxy, a full tmpfs) (root)
VENV ?= .venv
# The fast tests run on this many pytest-xdist workers, each module on one (its fixtures built once),
# each worker with its own etcd, kube-apiserver and S3 server; most of them wait on servers or on one core.
WORKERS ?= 2
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv

.PHONY: quickstart fashion-mnist test unit e2e faults node-prep lint bench-cpu clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/clusterfit run config=quickstart

# The recipe on a benchmark people know: Debian's Fashion-MNIST package (root, once), then 3 seeds.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist: $(VENV)/.installed
	@test -e $(FASHION_MNIST) || { apt-get -q update && apt-get -q install -y --no-install-recommends dataset-fashion-mnist; }
	$(VENV)/bin/clusterfit run config=fashion-mnist

# The node's Go binaries and images build in the background from here on (prepare_node.sh), beside
# the venv install and the fast tests; the node tests wait for them.
node-prep:
	bash tests/infra/prepare_node.sh start

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check clusterfit tests bench
	$(VENV)/bin/ruff format --check clusterfit tests bench
	$(VENV)/bin/mypy

# Everything CI runs: lint, the fast tests (real etcd, kube-apiserver, helm, S3), then the real node
# and the fault tests (both need the node's build: MinIO, toxiproxy).
test: node-prep $(VENV)/.installed lint
	bash tests/infra/build_bins.sh
	$(PY) -m pytest -n $(WORKERS) --dist loadfile
	bash tests/infra/prepare_node.sh wait
	$(PY) -m pytest -m "node or faults" tests/node tests/faults

# Only the fast tests (no node; root once, for the Debian packages of install_node_deps.sh).
unit: $(VENV)/.installed lint
	bash tests/infra/install_node_deps.sh
	bash tests/infra/build_bins.sh
	$(PY) -m pytest -n $(WORKERS) --dist loadfile

# Only the real-node tests: the cluster starts, the scenarios run, the cluster goes (root).
e2e: $(VENV)/.installed
	bash tests/infra/prepare_node.sh run
	$(PY) -m pytest -m node tests/node

# Only the storage fault tests: resets, stalls, 503s and 403s between the steps and MinIO; a full disk (root).
faults: $(VENV)/.installed
	bash tests/infra/build_bins.sh minio toxiproxy-server
	$(PY) -m pytest -m faults tests/faults

bench-cpu: $(VENV)/.installed
	$(PY) bench/cluster.py
	$(PY) bench/extract.py
	$(PY) bench/train.py
	$(PY) bench/run.py

clean:
	rm -rf runs bench/results
