"""``python -m olivepress.azureml push|pull|run|status``: the push image's entrypoint (its default command: push)."""

from olivepress.azureml.commands import azureml

azureml(prog_name="python -m olivepress.azureml")
