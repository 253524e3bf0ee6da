"""Serving: an OpenAI-compatible HTTP server over SpikeLM's O(1) model state (serve.py is the command line).

    states.StateStore   saved states (prefix states by token ids, session states), in memory and on disk
    engine.Engine       the continuous-batching scheduler: one worker thread runs the model
    text                chat rendering with message boundaries, incremental detokenization, stop strings
    app.create_app      the FastAPI application (needs the `serve` extra: fastapi, uvicorn)
"""
from .engine import Channel, Engine, GenerationRequest
from .states import StateStore, check_session_id, model_fingerprint
from .text import ChatFormat, IncrementalDetokenizer, StopMatcher

__all__ = ["Channel", "ChatFormat", "Engine", "GenerationRequest", "IncrementalDetokenizer", "StateStore",
           "StopMatcher", "check_session_id", "model_fingerprint"]
