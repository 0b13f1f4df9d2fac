"""xai-audit: batch audits of what vision models learned and why they decide.

Installed, the repository's top-level folders are this package's subpackages
(``xai_audit.flows``, ``xai_audit.tasks``, ``xai_audit.storage``, ``xai_audit.examples``) and its
package data (``configs/``, ``deployments/``).
"""
