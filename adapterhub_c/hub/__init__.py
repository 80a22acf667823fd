"""The Hugging Face Hub side: client (pull, push, search, validate, model cards) and server.

Modules: ``client`` (download_repo, push_folder, search_adapters, validate_lora_folder,
model_card), ``server`` (create_app, serve, BackgroundServer), ``store`` (repos and commits
on disk), ``cards``, ``validate``, ``faults``. Import them directly; this package imports
nothing heavy.
"""
