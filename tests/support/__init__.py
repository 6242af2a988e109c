"""Test helpers: tiny models, a local Hugging Face Hub, cache installation."""
