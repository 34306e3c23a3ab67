from django.contrib.auth import views as auth_views
from django.urls import path

from dispatch.web import operator, pages

urlpatterns = [
    path("", pages.chat, name="chat"),
    path("activity/", pages.activity, name="activity"),
    path("control/", operator.act, name="control"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
