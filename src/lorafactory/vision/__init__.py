"""Our facade over dghs-imgutils: detection, CCIP, tagging and classifiers.

imgutils runs one image per call and has a few quirks (``is_monochrome`` ignores its threshold,
tag dicts come in CSV order); these wrappers batch, sort and threshold explicitly.
imgutils is imported lazily so that HF_HUB_* settings made at start-up take effect.
"""
