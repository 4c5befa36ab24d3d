"""The embedded demo: ``build`` makes the synthetic reversal task and the tiny Llama base it fine-tunes.
Only the CLI (``qlora build-demo``), the benchmarks and the tests use it; the pipeline never imports it."""
