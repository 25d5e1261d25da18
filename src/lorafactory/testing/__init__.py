"""Test kit: tiny models, a stand-in model hub, synthetic characters and replay servers.

It lives in the package because both the test suite and ``lorafactory demo`` use it.
Nothing here is needed for real runs.
"""
