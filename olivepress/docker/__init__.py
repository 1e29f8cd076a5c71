"""The container side as the host drives it: the engine, image builds, compose runs and the infer container.

- ``engine``: a client for a running Docker engine, and the CLI / plugin checks (a missing one is exit 4);
- ``build``: the image table (the stages' images from ``contract.registry``, then ``server`` and ``push``),
  the ``docker buildx build`` line, provenance labels and pushing to a registry;
- ``compose``: the compose files of a run, each stage's result and the run's exit code;
- ``container``: the infer image run on a host folder;
- ``commands``: the ``olivepress docker build|up|infer`` verbs.

The ``docker`` Python SDK is imported inside functions only: ``olivepress --help`` works without it.
"""
