# Every target is a thin wrapper: the real work lives in scripts/ so it can be
# read, run and tested on its own.
.PHONY: build run demo test lint static image bench clean

build:
	cargo build --release

run: build
	./target/release/prefect-exporter

demo:
	scripts/demo.sh

test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

static:
	scripts/static.sh

image:
	scripts/image.sh

bench:
	scripts/bench.sh

clean:
	cargo clean
	rm -rf dist bench/work
