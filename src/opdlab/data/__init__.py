"""opdlab.data"""
