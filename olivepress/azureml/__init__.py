"""Azure ML: push and pull the optimized model (assets, models), run the stages as a pipeline job (pipeline).

- ``workspace``: which workspace or registry, the workspace options, sign-in and the client;
- ``errors``: what the SDK's failures mean to a user (messages and exit codes), retries, the SDK's console output;
- ``assets``: what the optimized folder is registered as (a base once, each adapter on its own, or one merged model),
  the tags and description each carries, and how pull puts the folder back together;
- ``models``: push and pull against the registry, and the adapters registered for a base;
- ``pipeline``: the pipeline job's spec from contract.registry, submitting and following it;
- ``commands``: the click commands, ``olivepress azureml push|pull|run|status`` (``python -m olivepress.azureml``).

Only click, the standard library and ``contract`` are imported here: the Azure SDK is imported inside the functions
that call it, so ``olivepress --help`` needs none of it, and the push image holds just this package and contract/.
"""
