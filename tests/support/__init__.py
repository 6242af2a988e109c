"""Test helpers: tiny models, a local Hugging Face Hub, cache installation, the one server launcher
(server_process.py), request bodies. Tests import helpers from here, never from conftest.py."""
