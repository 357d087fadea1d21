"""What training did to the model, measured: the spectrum of each update while it trains, and forgetting.

telemetry.py   the spectrum of each dW and its drift, from the factors, while training
divergence.py  KL divergence; forgetting on held-out text (loss, base loss, KL)
"""
