"""`lamda-edge serve`: an OpenAI-compatible HTTP endpoint over an export (FastAPI + uvicorn, the `[serve]` extra).

requests.py checks the bodies, admission.py bounds the work (slots, queue, deadlines), engine.py runs a request on
the one shared generator, app.py is the HTTP API, server.py runs it with a graceful SIGTERM drain.
"""
