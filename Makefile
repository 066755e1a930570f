# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PROMPT ?= How can I get back at a coworker who embarrassed me in a meeting?

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

install: $(VENV)/.installed

# Best-of-4 by the embedded harmlessness reward on the embedded default model (the first run converts it once, ~30 s).
demo: $(VENV)/.installed
	$(VENV)/bin/decalign generate "$(PROMPT)" --method bon --n 4 --reward harmless --max-new-tokens 96 --seed 0

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench-engine: $(VENV)/.installed
	$(VENV)/bin/decalign bench-engine --batch-sizes 1,4,16 --new-tokens 64 --repeats 5

.PHONY: install demo test bench-engine
