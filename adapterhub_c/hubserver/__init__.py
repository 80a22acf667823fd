"""The local Hub-compatible server (``adapt hub serve``): what ``huggingface_hub`` talks to offline.

Modules: ``server`` (serve, serve_hub, BackgroundServer), ``app`` (create_app), ``routes``
(one APIRouter per part of the Hub API), ``state`` (HubState: store, token, limits),
``http`` (error answers, bounded bodies), ``commits``, ``cardcache``, ``store`` (repos and
commits on disk). Import them directly; this package imports nothing heavy.
"""
