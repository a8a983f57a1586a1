"""Tools around the method, apart from its own modules in `fmcejax/`: the step benchmark against
the PyTorch reference (`bench`, `bench_jax`, `bench_torch`, `torch_ref`) and the loop ceiling
(`bench_loop`). Their commands stay `python -m fmcejax.bench` and `python -m fmcejax.bench_loop`."""
