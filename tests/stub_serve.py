"""`fashion-mnist serve` as the CLI runs it, on `write_stub_registry`'s stub models (a linear layer in numpy):
a real server process (its sockets, body parsers, gRPC, edge and signals) without TensorFlow, whose import and
model tracing cost about 5 CPU-s a start. For the real-process tests where the model's answers are not what is
tested. `python -m tests.stub_serve` takes the CLI's arguments."""

if __name__ == "__main__":
    # Imported here, not above: the body parsers' spawned processes import this module as their __main__.
    import functools
    import sys

    from fmnist.ops import cli
    from fmnist.serving import server
    from tests.serving_helpers import load_stub_model

    server.serve = functools.partial(server.serve, load=load_stub_model)  # what `cmd_serve` calls
    sys.exit(cli.main())
