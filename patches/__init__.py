"""Integrations that patch third-party frameworks (installed as ``ds_hexamoe.patches``)."""
