"""``adapt ui``: a read-only web page over the registry (FastAPI, Jinja2 templates, server-side SVG).

Every page has a JSON twin (``?format=json`` or ``/api/…``); the data comes from
``adapterhub_c.registry.pages`` (the same functions ``adapterhub_c.api`` exports), never from SQL
in a template. The CSS and JavaScript it needs are shipped in ``static/`` (no CDN).
"""
