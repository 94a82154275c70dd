print("train.py placeholder for synth probe")
