"""`crystalline serve`: an OpenAI-compatible completion server with
continuous batching (`pip install 'crystalline-cllm[serve]'`).

    scheduler.py  one model, a KV cache of --max-batch slots, one decode call
                  per step for every running sequence, in a background thread
    schemas.py    the request bodies (pydantic) and the chat template
    app.py        the FastAPI app (endpoints, errors, streaming, API key) and
                  `listen`/`run` with uvicorn

```python
from crystalline import load
from crystalline.serve import create_app, listen, run
sock = listen("127.0.0.1", 8000)
run(create_app(load("runs/my-run"), max_batch=8), sock)
```
"""

from crystalline.serve.app import create_app, exposure_warning, is_loopback, listen, run, serve_forever, url
from crystalline.serve.scheduler import Overloaded, Scheduler

__all__ = ["Overloaded", "Scheduler", "create_app", "exposure_warning", "is_loopback", "listen", "run", "serve_forever",
           "url"]
