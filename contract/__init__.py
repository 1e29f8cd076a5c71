"""The contract between the host side (``olivepress``) and the container side (``stages``, ``runtime``).

- ``registry``: the stages, what each needs and publishes, its image, and what status, report and Azure ML show;
- ``volume``: the layout of one home folder, the manifests, atomic publishing;
- ``model_folder``: the layout of an optimized model folder (what optimize writes, infer/serve read, push moves);
- ``exits``: the exit codes every command shares;
- ``families``: the decoder families every stage takes, and what each stage needs to know of one.

Torch-free, and small enough for the slim image: everything here imports click and the standard library only.
"""
