"""Shared pieces of the four scripts: model loading and teacher scoring (teacher.py), the token format
of one episode (episode.py), and the embedded tiny default (tiny.py loads the models shipped in tiny_models/;
tiny_build.py is the recipe that made them)."""
