"""The video-QA study on the shared case runner: ``hooked-vlm video {infer,trace,probe,mean-vector,check-indexing}``.

Modules, one job each: :mod:`.decoding` (files -> frames), :mod:`.annotations` (the entry format and
``--make-data``), :mod:`.clips` (an entry's frames and prompt), :mod:`.model_io` (inputs and candidate tokens),
:mod:`.spans` (token slices and frame spans -> positions), :mod:`.counterfactual_set`, :mod:`.infer`,
:mod:`.trace`, :mod:`.trace_report`, :mod:`.representations`, :mod:`.probe`, :mod:`.mean_vector`,
:mod:`.check_indexing` and :mod:`.cli`. See docs/video.md.
"""
