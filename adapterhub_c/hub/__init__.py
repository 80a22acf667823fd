"""The Hugging Face Hub, client side: pull, push, search, validate, model cards.

Modules: ``client`` (download_repo, push_folder, search_adapters, validate_lora_folder,
model_card), ``validate`` (LoRA folder checks), ``cards`` (model cards and their front
matter), ``names`` (the Hub's repo-id rules, git blob ids). Nothing here touches the
registry: the pull / push workflows live in :mod:`adapterhub_c.workflows.pull` and
:mod:`adapterhub_c.workflows.push`, the local Hub-compatible server in
:mod:`adapterhub_c.hubserver`. Import the modules directly; this package imports nothing heavy.
"""
