# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv (Python >= 3.10, uv when it can be installed, else pip) and need the
# ffmpeg/ffprobe binaries, installed with apt-get when missing and running as root; `make test`
# likewise installs chromium + chromedriver for the listening report's browser tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install ffmpeg browser clean-work gpu-check

demo: $(STAMP)
	$(BIN)/pipeline demo

test: $(STAMP) browser
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

# The browser tests skip without a browser unless CI is set, where they fail instead.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || \
	    ! { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "note: the listening report's browser tests need chromium and chromedriver (Debian/Ubuntu: sudo apt-get install chromium chromium-driver); without them they are skipped, or fail when CI is set"; \
		fi; \
	fi

clean-work:
	rm -rf work
