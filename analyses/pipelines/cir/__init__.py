"""Composed image retrieval (SEARLE-style) with Grad-ECLIP / gradient x activation explanations.

``hooked-vlm cir build-db`` embeds an image folder into a database file (:mod:`.database`);
``hooked-vlm cir query`` retrieves with "a photo of $ that {caption}" (``$ = phi(reference)``) and explains each
query four ways (:mod:`.explain`), writing maps, figures and a JSON (:mod:`.query`). See docs/cir.md.
"""
