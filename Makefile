.PHONY: demo test check bench
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
check:
	bash scripts/check.sh
