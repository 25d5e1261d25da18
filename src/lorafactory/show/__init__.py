"""A show's episodes to named characters' datasets: extract, cluster, name, build (``lorafactory anime``).

Everything lives in ``<workspace>/_shows/<show>/``:

- ``episodes/<episode>/``: crops, CCIP features and frame signatures per episode (``sources.anime``);
- ``references/<name>/``: CCIP features of a candidate name's reference images, crawled once;
- ``clusters.json``: the clustering, reused while the extracted episodes are unchanged;
- ``contact/cluster_<n>.png``: a contact sheet per cluster;
- ``names.toml``: the user's corrections (rename, merge, drop), read on every run, never written;
- ``datasets/<slug>-<digest>/`` and ``regularization/<slug>-<digest>/``: a named character's crops and
  frames of the show without her, as hard links; the digest changes with the content, so the
  character's pipeline sees a changed dataset as changed settings and rebuilds;
- ``manifest.json``: counts per filter and per cluster, the names and the datasets, written last.

Each named character gets a workspace entry whose settings read her dataset (``crawl.source =
"anime"``), so ``prepare``, ``train``, ``evaluate`` and ``release`` run unchanged.
"""
