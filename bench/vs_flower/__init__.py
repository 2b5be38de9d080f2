"""``python -m bench.vs_flower``: fedwb's round cost next to Flower's and the wire's floor (see ``main``)."""
