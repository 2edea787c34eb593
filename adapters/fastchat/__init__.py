"""Pagoda as a FastChat model worker: FastChat's worker protocol served from Pagoda's engine.

A worker registers with a FastChat controller and answers its peers (the controller, FastChat's
OpenAI API server, its Gradio UIs) exactly as fastchat 0.2.36's workers do. fschat itself is
optional: it is imported only to look up conversation templates when it is installed.
"""

from pagoda.adapters.fastchat.registration import ControllerRegistration
from pagoda.adapters.fastchat.worker import FastChatWorker
from pagoda.adapters.fastchat.worker_app import worker_routes

__all__ = ["ControllerRegistration", "FastChatWorker", "worker_routes"]
