"""`fluxkit serve`: a resident image-generation service (FastAPI + uvicorn).

Modules: `config` (what to serve), `schemas` (HTTP bodies), `job_request` (validation into one job), `jobs` (SQLite
job store), `engine` (a loaded model and its LoRAs), `worker` (queue, batching, cancel, progress), `app` (the FastAPI
app), `openai_api` and `replicate_api` (the two APIs), `cli` (the command), `ray_app` (Ray Serve), `web/` (the UI).
Nothing here is imported by the rest of fluxkit, so the core never needs FastAPI.
"""
