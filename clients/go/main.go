// Command laneway-go submits one chat job to a Laneway broker and follows its
// events to the end, with stubs generated from protos/laneway/v1 (see README.md).
//
//	laneway-go [-addr 127.0.0.1:50051] [-route chat] [-text "hello from go"] [-timeout 30s]
//
// Exit status: 0 when the job SUCCEEDED, 1 when it ended in another final state
// (or the stream ended before a final event), 2 on a gRPC or usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	lanewayv1 "github.com/laneway-dev/laneway/gen/go/laneway/v1"
)

// The states no event follows (job.proto, JobState).
var finalStates = map[lanewayv1.JobState]bool{
	lanewayv1.JobState_JOB_STATE_SUCCEEDED:     true,
	lanewayv1.JobState_JOB_STATE_NOT_ENQUEUED:  true,
	lanewayv1.JobState_JOB_STATE_CANCELLED:     true,
	lanewayv1.JobState_JOB_STATE_EXPIRED:       true,
	lanewayv1.JobState_JOB_STATE_DEAD_LETTERED: true,
	lanewayv1.JobState_JOB_STATE_SUPERSEDED:    true,
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "broker address")
	route := flag.String("route", "chat", "route to submit the job to (a route of the broker config)")
	text := flag.String("text", "hello from go", "the user message")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for the whole run")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	os.Exit(run(ctx, *addr, *route, *text))
}

func run(ctx context.Context, addr, route, text string) int {
	// Plaintext, as `laneway up` serves. grpc.WithInsecure is what grpc-go before
	// 1.34 has; later versions also offer credentials/insecure.NewCredentials().
	conn, err := grpc.DialContext(ctx, addr, grpc.WithInsecure())
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	client := lanewayv1.NewBrokerServiceClient(conn)

	submitted, err := client.Submit(ctx, &lanewayv1.SubmitRequest{Job: &lanewayv1.JobSpec{
		Route: route,
		Input: &lanewayv1.JobSpec_Chat{Chat: &lanewayv1.ChatInput{
			Messages: []*lanewayv1.ChatMessage{{Role: lanewayv1.ChatRole_CHAT_ROLE_USER, Content: text}},
		}},
	}})
	if err != nil {
		return fail(err)
	}
	jobID := submitted.GetJobId()
	fmt.Printf("submitted job_id=%s\n", jobID)

	stream, err := client.StreamResults(ctx, &lanewayv1.StreamResultsRequest{JobIds: []string{jobID}})
	if err != nil {
		return fail(err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			fmt.Fprintln(os.Stderr, "the stream ended before a final event")
			return 1
		}
		if err != nil {
			return fail(err)
		}
		event := resp.GetEvent()
		fmt.Printf("seq=%d state=%s\n", event.GetSeq(), event.GetState())
		if !finalStates[event.GetState()] {
			continue
		}
		if event.GetState() == lanewayv1.JobState_JOB_STATE_SUCCEEDED {
			fmt.Printf("final state=%s text=%q\n", event.GetState(), event.GetResult().GetChat().GetText())
			return 0
		}
		jobErr := event.GetError()
		fmt.Printf("final state=%s error=%s message=%q\n", event.GetState(), jobErr.GetCode(), jobErr.GetMessage())
		return 1
	}
}

// fail prints a gRPC error's status code and message, and the reason and
// metadata of its google.rpc.ErrorInfo (every broker error carries one).
func fail(err error) int {
	st := status.Convert(err)
	fmt.Fprintf(os.Stderr, "error: code=%s message=%q\n", st.Code(), st.Message())
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			fmt.Fprintf(os.Stderr, "error: reason=%s domain=%s metadata=%v\n", info.GetReason(), info.GetDomain(), info.GetMetadata())
		}
	}
	return 2
}
