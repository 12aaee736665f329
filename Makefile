# The two set-up commands of the README:
#   make demo   install, then run the main job end to end on the bundled data (../shared/data)
#   make test   install, start the local Slurm cluster and install chromium (each when it can be), run the test suite
PYTHON ?= python3
DATA_ROOT ?= $(abspath ../shared/data)
OUT ?= output/demo

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	CROSSMAE_DATA_ROOT=$(DATA_ROOT) $(PYTHON) -m slurm.main_job --data-root $(DATA_ROOT) --output-dir $(OUT)

test: install
	-bash slurm/cluster.sh ensure
	-command -v chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }  # leaderboard.html test
	CROSSMAE_DATA_ROOT=$(DATA_ROOT) $(PYTHON) -m pytest -q --durations=25
