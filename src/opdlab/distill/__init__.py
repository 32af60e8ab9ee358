"""opdlab.distill"""
