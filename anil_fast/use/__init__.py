"""Using a trained model: FewShotClassifier (predict.py), its export (export.py), and Lake et
al.'s 20 one-shot runs (lake.py)."""
