"""`crystalline dashboard`: a local web page that watches runs train
(`pip install 'crystalline-cllm[serve]'`; it runs on the same FastAPI and
uvicorn as `crystalline serve`, as an app of its own).

    runs.py    the runs under a directory, their metrics read as they grow,
               the current epoch's sphere figures, their checkpoints
    app.py     the FastAPI app: the page and the JSON API it polls
    static/    the page, its script and stylesheet: no network needed

```python
from crystalline.dashboard import create_app
from crystalline.serve import listen, serve_forever
serve_forever(create_app("runs"), listen("127.0.0.1", 8001))
```
"""

from crystalline.dashboard.app import create_app

__all__ = ["create_app"]
