"""Shared pieces of the four scripts: model loading and teacher scoring (teacher.py), the token format
of one episode (episode.py), and the embedded tiny default (tiny.py)."""
