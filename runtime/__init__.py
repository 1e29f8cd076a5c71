"""What the slim CPU image runs: generation with onnxruntime-genai, the OpenAI-compatible server and the chat.

- ``engine``: one loaded model folder and its adapters, the one generation loop (infer, serve and chat use it);
- ``openai_api``: OpenAI's chat-completions request and response logic, free of sockets;
- ``http``: the HTTP server over it; ``serve`` and ``chat``: the click commands (``python -m runtime.serve``).

Torch-free: the standard library, click, rich, numpy, onnxruntime_genai and ``contract`` only.
"""
