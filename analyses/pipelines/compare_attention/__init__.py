"""Two VLMs on the same images and paraphrased yes/no questions: where each answer looks, how stable it is.

``hooked-vlm compare-attention --csv FILE --models A B --output-dir DIR`` (docs/compare_attention.md): per model
and CSV row the answer, its probability and correctness, three maps on the image (answer-token attention from the
attention-statistics kernels, Grad-CAM on the vision tower, gradient saliency), their metrics (entropy, Gini,
finding / marker box mass); per model paraphrase robustness; clustered-bootstrap statistics and paired tests.
"""
