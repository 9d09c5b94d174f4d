# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv (Python >= 3.10, uv when it can be installed, else pip) and need the
# ffmpeg/ffprobe binaries, installed with apt-get when missing and running as root.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install ffmpeg clean-work gpu-check

demo: $(STAMP)
	$(BIN)/pipeline demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

# On a CUDA machine: CUDA tests, full-size htdemucs/umxl caching, MDX-Mixer bf16, 2-rank DDP (< 5 min)
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

$(STAMP): pyproject.toml | ffmpeg
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: $(PYTHON) is older than 3.10; set PYTHON=python3.11 (or newer)"; exit 1; }
	@if $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv; then \
		$(PYTHON) -m uv venv --allow-existing --quiet --python $(PYTHON) $(VENV) && \
		$(PYTHON) -m uv pip install --python $(BIN)/python -e '.[test]' && \
		$(PYTHON) -m uv pip check --python $(BIN)/python; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet -e '.[test]' && $(BIN)/pip check; \
	fi
	@touch $(STAMP)

ffmpeg:
	@if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; \
		else \
			echo "error: ffmpeg and ffprobe are needed on PATH (Debian/Ubuntu: sudo apt-get install ffmpeg; macOS: brew install ffmpeg)"; exit 1; \
		fi; \
	fi

clean-work:
	rm -rf work
