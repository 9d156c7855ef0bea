"""HTTP service over :class:`seqrec.predictor.SessionRecommender` (FastAPI) and its demo widget.

``seqrec-serve EXPORT_DIR`` (:func:`seqrec.serving.app.main`) starts it; no model logic lives here.
"""
