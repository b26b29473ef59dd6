"""Helpers shared by the tests: load a top-level CLI or bench script as a module (they are
files, not package modules: `refine.py` shares its name with the `refine` package), and pick a
free port for torchrun (a fixed one collides with any other run on the machine, and with the
other worker when the suite runs in parallel)."""

import importlib.util
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def load_script(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
