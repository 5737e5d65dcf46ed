"""Dockerfiles: the lexer (lines, continuations, escapes, heredocs, flags), the parser
(stages, instructions, build arguments) and `.dockerignore` matching.

May import: nothing of forge but `forge.formats.errors`.
"""
