//! A cap on every answer the bucket gives. The SDK reads a non-streaming answer (a listing
//! page, a HEAD's or an upload's result, any error) whole into memory before parsing it, with
//! no limit of its own: a server answering with an endless or enormous body would have the
//! node hold all of it. Past [`MAX_ANSWER`] bytes the body ends in error instead, and the
//! request fails at once, not retried (the same server would only send the same again).
//! Streamed bodies (GET) pass through the same cap; the only one the mirror reads
//! ([`super::Bucket::get_small`]) has a smaller cap of its own. [`guarded`] puts both on a
//! client's configuration.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_sdk_s3::config::interceptors::{
    BeforeDeserializationInterceptorContextMut, InterceptorContext,
};
use aws_sdk_s3::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::primitives::SdkBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The most bytes one answer may have. A full ListObjectsV2 page (1,000 keys of up to
/// 1,024 bytes each, with their sizes, tags and dates) is under 2 MiB.
pub const MAX_ANSWER: u64 = 16 << 20;

/// `conf` with every answer capped, and an answer past the cap not retried.
pub fn guarded(conf: aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder {
    conf.interceptor(CapAnswers)
        .retry_classifier(NoRetryPastCap)
}

/// The interceptor that wraps every answer's body in a [`Capped`] one.
#[derive(Debug)]
pub struct CapAnswers;

impl Intercept for CapAnswers {
    fn name(&self) -> &'static str {
        "narmesh::CapAnswers"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.response_mut().body_mut();
        let answer = std::mem::replace(body, SdkBody::taken());
        *body = answer.map(|inner| {
            SdkBody::from_body_1_x(Capped {
                inner,
                left: MAX_ANSWER,
            })
        });
        Ok(())
    }
}

/// An answer's body that fails once more than [`MAX_ANSWER`] bytes came.
struct Capped {
    inner: SdkBody,
    left: u64,
}

/// What a body past the cap ends with.
#[derive(Debug, thiserror::Error)]
#[error("the S3 server's answer is longer than {MAX_ANSWER} bytes")]
pub struct TooLong;

impl Body for Capped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if n > this.left {
                this.left = 0;
                return Poll::Ready(Some(Err(TooLong.into())));
            }
            this.left -= n;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        Body::size_hint(&self.inner)
    }
}

/// Forbids retrying a request whose answer went past the cap (the SDK takes a body that
/// failed to read as a transient error, and would read up to [`MAX_ANSWER`] again and again).
#[derive(Debug)]
struct NoRetryPastCap;

impl ClassifyRetry for NoRetryPastCap {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(e)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if c.is::<TooLong>() {
                return RetryAction::RetryForbidden;
            }
            cause = c.source();
        }
        RetryAction::NoActionIndicated
    }

    fn name(&self) -> &'static str {
        "narmesh::NoRetryPastCap"
    }
}
