"""Tools around the method, apart from its own modules in `fmcejax/`: the step benchmark against
the PyTorch reference (`bench`, `bench_jax`, `bench_torch`, `torch_ref`), the loop ceiling
(`bench_loop`) and preflight's compiling half and chip figures (`preflight_compile`,
`preflight_targets`). Their commands stay `python -m fmcejax.bench`, `fmcejax.bench_loop` and
`fmcejax.preflight`."""
