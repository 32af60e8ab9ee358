"""opdlab.report"""
